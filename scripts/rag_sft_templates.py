"""The text of scripts/make_rag_sft.py's synthetic documents: word pools for random facts,
and for each kind of document (lease, invoice, schedule, letter, policy) its fact
sentences, boilerplate, questions and answers, each with several phrasings.

Every list of phrasings is split by `make_rag_sft.phrasings`: the last HELDOUT_PHRASINGS
variants are used only for the held-out set, the others only for training, so held-out
questions and documents are worded differently from anything trained on. All text here
is written for this project (synthetic; no outside source).

Placeholders: {v} the fact's value, {a} the document's anchor (what names it in a
question), and {<field>} any other fact of the same document.
"""

from __future__ import annotations


def _words(text: str) -> list[str]:
    return text.split()


FIRST_NAMES = _words(
    "Ada Alan Amara Anika Arjun Beatriz Bogdan Carmen Chen Dalia Daniel Dmitri Elena "
    "Emeka Esther Farah Felix Fiona Gabriel Grace Hana Hugo Ines Ivan Jamal Jana Joao "
    "Julia Kofi Lars Layla Leon Lina Lucas Maya Mateo Mei Miriam Nadia Naveen Nina "
    "Omar Oskar Paloma Priya Rafael Rosa Ruth Samir Sara Selim Sofia Tariq Tessa "
    "Tomas Uma Vera Wen Yusuf Zara"
)
LAST_NAMES = _words(
    "Abara Alvarez Andersen Bakker Banerjee Castillo Chowdhury Costa Dubois Eriksen "
    "Fischer Fonseca Garcia Haddad Hansen Ibrahim Ito Jensen Kaplan Kowalski Larsen "
    "Lindqvist Mahler Mendes Moreau Murphy Nakamura Novak Okafor Olsen Ortega Park "
    "Petrov Quinn Rahman Reyes Rossi Sato Schmidt Silva Sorensen Suzuki Tanaka Torres "
    "Varga Vogel Walsh Weber Yilmaz Zhou"
)
STREETS = _words(
    "Elm Oak Maple Cedar Willow Birch Harbor Mill Station Church Orchard Meadow "
    "Quarry Lantern Bridge Chapel Garden Market Spring Hollow Ridge Brook Heather "
    "Juniper Laurel"
)
STREET_KINDS = ["Street", "Road", "Lane", "Avenue", "Court", "Way"]
CITIES = _words(
    "Ashford Brookvale Carlow Dunmore Eastwick Fairhaven Glenrock Hartwell Islington "
    "Kingsbridge Lakeside Millbrook Northam Oakridge Pinecrest Queensbury Riverton "
    "Stonebridge Thornbury Westfield"
)
COMPANY_WORDS = _words(
    "Northwind Bluestone Redwood Silverline Greenfield Ironbark Clearwater Sunridge "
    "Highgate Amberleigh Copperfield Westbrook Stormhaven Brightwater Foxglove "
    "Kestrel"
)
COMPANY_KINDS = _words(
    "Logistics Bakery Printing Carpentry Analytics Dental Clinic Plumbing Books "
    "Textiles Engineering Catering Landscaping"
)
COMPANY_SUFFIXES = ["Ltd", "Group", "Partners", "& Co", "Company"]
EVENT_WORDS = _words(
    "Pottery Watercolour Bookbinding Beekeeping Chess Photography Woodcarving "
    "Gardening Astronomy Baking Calligraphy Sailing Orienteering Weaving Birdwatching"
)
EVENT_KINDS = ["Workshop", "Course", "Club", "Retreat", "Seminar", "Masterclass"]
SEASONS = ["Spring", "Summer", "Autumn", "Winter", "Evening", "Weekend"]
MONTHS = _words(
    "January February March April May June July August September October November December"
)

# Boilerplate every kind may use: text around the facts, and distractor material.
COMMON_FILLER = [
    "This document is provided for information and should be kept with your records.",
    "Please read every section carefully before signing or replying.",
    "Any change to these terms must be agreed in writing by both parties.",
    "Headings are for convenience only and do not affect the meaning of the text.",
    "Questions about this document may be raised with the office during business hours.",
    "Copies of this document are available on request at no charge.",
]

KINDS: dict[str, dict] = {
    "lease": {
        "anchor": "address",
        "titles": [
            "Residential Lease Agreement",
            "Tenancy Agreement",
            "Lease of Residential Premises",
        ],
        "intro": [
            "This agreement is made between {landlord} (the Landlord) and {tenant} (the Tenant) "
            "for the premises at {a}.",
            "{landlord}, as Landlord, agrees to let the property at {a} to {tenant}, as Tenant, "
            "on the terms below.",
            "The Landlord, {landlord}, and the Tenant, {tenant}, enter into this lease for the "
            "dwelling located at {a}.",
        ],
        "facts": {
            "rent": [
                "The Tenant shall pay a monthly rent of {v}, due on the first day of each month.",
                "Rent is {v} per month, payable in advance.",
                "Each month the Tenant pays rent of {v} to the Landlord.",
                "The rent for the premises is set at {v} for every calendar month.",
            ],
            "deposit": [
                "A security deposit of {v} is payable before the Tenant moves in.",
                "The Tenant has paid a deposit of {v}, held against damage to the property.",
                "Before occupation the Tenant lodges a security deposit of {v}.",
                "The Landlord holds {v} as a security deposit for the length of the tenancy.",
            ],
            "notice": [
                "The Tenant must give at least {v} written notice before leaving the premises.",
                "To end the tenancy, the Tenant shall give the Landlord {v} notice in writing.",
                "Either party may end this lease by giving {v} written notice to the other.",
                "A Tenant who wishes to move out must notify the Landlord in writing {v} in advance.",
            ],
            "start": [
                "The tenancy begins on {v}.",
                "This lease starts on {v} and continues for the agreed term.",
                "The Tenant may take possession of the premises on {v}.",
                "The term of the lease commences on {v}.",
            ],
        },
        "filler": [
            "The Tenant shall keep the premises clean and in good repair.",
            "No pets are allowed without the Landlord's written consent.",
            "The Landlord is responsible for repairs to the roof, walls and plumbing.",
            "The Tenant shall not sublet the premises without permission.",
            "Smoking is not permitted anywhere inside the dwelling.",
            "Utilities such as electricity and internet are paid by the Tenant.",
        ],
        "questions": {
            "rent": [
                "What is the monthly rent for {a}?",
                "How much rent is due each month at {a}?",
                "What does the tenant of {a} pay per month?",
                "How much does it cost each month to rent {a}?",
                "What monthly amount does the lease for {a} charge?",
            ],
            "deposit": [
                "How large is the security deposit for {a}?",
                "What deposit did the tenant of {a} pay?",
                "How much is held as a deposit for the lease of {a}?",
                "What security deposit does the lease for {a} require?",
                "What sum was lodged as a deposit for {a}?",
            ],
            "notice": [
                "How much notice must the tenant of {a} give before leaving?",
                "What notice period applies to ending the lease for {a}?",
                "How far in advance must the tenant at {a} give notice to move out?",
                "How much notice is needed to end the tenancy at {a}?",
                "If the tenant wants to leave {a}, how much notice do they have to give?",
            ],
            "start": [
                "When does the tenancy at {a} begin?",
                "On what date does the lease for {a} start?",
                "When can the tenant move into {a}?",
                "What is the start date of the lease for {a}?",
                "From what date is {a} let to the tenant?",
            ],
            "landlord": [
                "Who is the landlord of {a}?",
                "Who owns and lets the property at {a}?",
                "Who is named as landlord in the lease for {a}?",
                "Which person lets {a} to the tenant?",
                "Who is the landlord in the tenancy agreement for {a}?",
            ],
            "tenant": [
                "Who is the tenant at {a}?",
                "Who rents the property at {a}?",
                "Who is named as tenant in the lease for {a}?",
                "Which person is renting {a}?",
                "Who signed the lease for {a} as tenant?",
            ],
        },
        "answers": {
            "rent": ["The monthly rent is {v}", "The tenant pays {v} a month"],
            "deposit": ["The security deposit is {v}", "A deposit of {v} was paid"],
            "notice": ["The tenant must give {v} notice", "The notice period is {v}"],
            "start": ["The tenancy begins on {v}", "The lease starts on {v}"],
            "landlord": ["The landlord is {v}", "{v} is the landlord"],
            "tenant": ["The tenant is {v}", "{v} is the tenant"],
        },
    },
    "invoice": {
        "anchor": "invoice",
        "titles": ["Invoice", "Tax Invoice", "Invoice for Services"],
        "intro": [
            "Invoice number {a}, issued by {vendor} to {customer}.",
            "{vendor} bills {customer} as set out in invoice {a}.",
            "This is invoice {a} from {vendor}, addressed to {customer}.",
        ],
        "facts": {
            "total": [
                "The total amount due is {v}.",
                "Amount payable, including tax: {v}.",
                "The invoice comes to a total of {v}.",
                "Please pay the full balance of {v}.",
            ],
            "due": [
                "Payment is due by {v}.",
                "This invoice must be paid no later than {v}.",
                "Please settle the balance on or before {v}.",
                "The due date for payment is {v}.",
            ],
            "late_fee": [
                "Late payments incur a fee of {v} per month on the unpaid balance.",
                "A charge of {v} a month applies to overdue amounts.",
                "Interest of {v} per month is added to any balance paid late.",
                "Overdue balances attract a late fee of {v} monthly.",
            ],
        },
        "filler": [
            "Thank you for your business.",
            "Goods remain the property of the seller until paid for in full.",
            "Please quote the invoice number with your payment.",
            "Bank transfer is the preferred method of payment.",
            "Queries about this invoice should be raised within fourteen days.",
            "Services were delivered as agreed in the original quotation.",
        ],
        "questions": {
            "total": [
                "What is the total amount due on invoice {a}?",
                "How much must be paid for invoice {a}?",
                "What does invoice {a} come to in total?",
                "What is the balance payable on invoice {a}?",
                "How much money does invoice {a} ask for?",
            ],
            "due": [
                "When is invoice {a} due?",
                "By what date must invoice {a} be paid?",
                "What is the payment deadline for invoice {a}?",
                "When does payment of invoice {a} fall due?",
                "What is the last day to pay invoice {a}?",
            ],
            "late_fee": [
                "What late fee applies to invoice {a}?",
                "How much is charged if invoice {a} is paid late?",
                "What is the monthly charge on overdue amounts for invoice {a}?",
                "What penalty applies when invoice {a} is overdue?",
                "What interest is added if invoice {a} is not paid on time?",
            ],
            "vendor": [
                "Who issued invoice {a}?",
                "Which company sent invoice {a}?",
                "Who is the seller on invoice {a}?",
                "Which business billed the customer in invoice {a}?",
                "Who is owed the money on invoice {a}?",
            ],
            "customer": [
                "Who is invoice {a} addressed to?",
                "Who must pay invoice {a}?",
                "Who is the customer on invoice {a}?",
                "To whom was invoice {a} sent?",
                "Who was billed in invoice {a}?",
            ],
        },
        "answers": {
            "total": ["The total amount due is {v}", "The invoice totals {v}"],
            "due": ["The invoice is due by {v}", "Payment is due on {v}"],
            "late_fee": [
                "The late fee is {v} per month",
                "Overdue amounts are charged {v} a month",
            ],
            "vendor": ["The invoice was issued by {v}", "{v} issued the invoice"],
            "customer": ["The invoice is addressed to {v}", "{v} is the customer"],
        },
    },
    "schedule": {
        "anchor": "event",
        "titles": ["Course Schedule", "Programme and Timetable", "Event Schedule"],
        "intro": [
            "Schedule for the {a}, led by {instructor}.",
            "The {a} is taught by {instructor}; the timetable follows.",
            "Here is the programme of the {a}, with {instructor} as tutor.",
        ],
        "facts": {
            "first_day": [
                "The first session takes place on {v}.",
                "Classes begin on {v}.",
                "The opening session is held on {v}.",
                "We meet for the first time on {v}.",
            ],
            "time": [
                "Sessions start at {v} and last two hours.",
                "Each meeting begins promptly at {v}.",
                "Doors open ten minutes before the {v} start.",
                "Every session runs from {v} for about two hours.",
            ],
            "room": [
                "All sessions are held in {v}.",
                "The group meets in {v} of the community centre.",
                "Please come to {v} for every session.",
                "The venue for the sessions is {v}.",
            ],
            "fee": [
                "The fee for the full course is {v}.",
                "Participants pay {v} for all sessions.",
                "The cost of taking part is {v}, materials included.",
                "Enrolment costs {v} per person.",
            ],
        },
        "filler": [
            "Please bring a notebook and wear comfortable clothes.",
            "Tea and coffee are available during the break.",
            "Places are limited, so early registration is advised.",
            "Sessions may be rescheduled in bad weather.",
            "Beginners are welcome and no experience is needed.",
            "Parking is available behind the building.",
        ],
        "questions": {
            "first_day": [
                "When is the first session of the {a}?",
                "On what date does the {a} begin?",
                "When does the {a} start?",
                "What day is the opening session of the {a}?",
                "When do participants of the {a} first meet?",
            ],
            "time": [
                "What time do sessions of the {a} start?",
                "At what time does each meeting of the {a} begin?",
                "When in the day does the {a} meet?",
                "What is the start time of the {a}?",
                "At what hour should I arrive for the {a}?",
            ],
            "room": [
                "Where is the {a} held?",
                "In which room does the {a} meet?",
                "What is the venue of the {a}?",
                "Which room should I go to for the {a}?",
                "Where do the sessions of the {a} take place?",
            ],
            "fee": [
                "How much does the {a} cost?",
                "What is the fee for the {a}?",
                "What do participants pay for the {a}?",
                "How much is enrolment in the {a}?",
                "What is the price of the {a}?",
            ],
            "instructor": [
                "Who leads the {a}?",
                "Who teaches the {a}?",
                "Who is the tutor of the {a}?",
                "Which person runs the {a}?",
                "Who is in charge of the {a}?",
            ],
        },
        "answers": {
            "first_day": ["The first session is on {v}", "It begins on {v}"],
            "time": ["Sessions start at {v}", "Each meeting begins at {v}"],
            "room": ["It is held in {v}", "The sessions take place in {v}"],
            "fee": ["The fee is {v}", "It costs {v}"],
            "instructor": ["It is led by {v}", "{v} teaches it"],
        },
    },
    "letter": {
        "anchor": "reference",
        "titles": ["Letter", "Correspondence", "Notice Letter"],
        "intro": [
            "Our reference: {a}. Dear {recipient},",
            "Reference {a}\n\nDear {recipient},",
            "Re: our file {a}. Dear {recipient},",
        ],
        "facts": {
            "appointment": [
                "Your appointment has been booked for {appointment_day} at {v}.",
                "We expect you at our office at {v} on {appointment_day}.",
                "Please attend the meeting on {appointment_day}, which starts at {v}.",
                "You are invited to see us on {appointment_day} at {v}.",
            ],
            "appointment_day": [
                "We have arranged a meeting with you on {v}.",
                "A meeting has been set for {v}.",
                "Your visit is planned for {v}.",
                "We would like to see you on {v}.",
            ],
            "balance": [
                "Our records show an outstanding balance of {v}.",
                "The amount still owed on your account is {v}.",
                "You currently owe {v} on this account.",
                "An unpaid sum of {v} remains on your account.",
            ],
            "sender": [
                "Yours sincerely, {v}",
                "Kind regards, {v}",
                "With best wishes, {v}",
                "Respectfully, {v}",
            ],
        },
        "filler": [
            "Thank you for your letter of last month.",
            "If anything is unclear, please do not hesitate to contact us.",
            "Please bring proof of identity with you.",
            "We apologise for any inconvenience caused.",
            "This letter has been sent to the address we hold on file.",
            "Please keep this letter for your records.",
        ],
        "questions": {
            "appointment": [
                "At what time is the appointment in letter {a}?",
                "What time should the recipient of letter {a} attend?",
                "When in the day is the meeting set in letter {a}?",
                "What time does the meeting in letter {a} start?",
                "At what hour is the visit booked in letter {a}?",
            ],
            "appointment_day": [
                "On what date is the meeting in letter {a}?",
                "What day has been arranged in letter {a}?",
                "When is the visit planned in letter {a}?",
                "What is the date of the appointment in letter {a}?",
                "For which date does letter {a} set a meeting?",
            ],
            "balance": [
                "What balance is owed according to letter {a}?",
                "How much does the recipient of letter {a} owe?",
                "What amount is outstanding in letter {a}?",
                "What unpaid sum does letter {a} mention?",
                "How much money is still due according to letter {a}?",
            ],
            "sender": [
                "Who wrote letter {a}?",
                "Who signed letter {a}?",
                "Who is the sender of letter {a}?",
                "Whose name is at the end of letter {a}?",
                "Who sent the letter with reference {a}?",
            ],
            "recipient": [
                "Who is letter {a} addressed to?",
                "Who received letter {a}?",
                "To whom is letter {a} written?",
                "Who is the recipient of letter {a}?",
                "Which person was sent letter {a}?",
            ],
        },
        "answers": {
            "appointment": ["The appointment is at {v}", "The meeting starts at {v}"],
            "appointment_day": ["The meeting is on {v}", "It is set for {v}"],
            "balance": ["The outstanding balance is {v}", "The recipient owes {v}"],
            "sender": ["The letter was written by {v}", "{v} signed the letter"],
            "recipient": ["The letter is addressed to {v}", "It was written to {v}"],
        },
    },
    "policy": {
        "anchor": "company",
        "titles": ["Staff Policy", "Employee Handbook: Key Terms", "Workplace Policy"],
        "intro": [
            "This policy applies to all employees of {a} and takes effect on {effective}.",
            "{a} issues this handbook to its staff; it is in force from {effective}.",
            "From {effective}, every member of staff at {a} is covered by the rules below.",
        ],
        "facts": {
            "vacation": [
                "Full-time employees are entitled to {v} of paid holiday per year.",
                "Each employee receives {v} of annual leave.",
                "Staff may take {v} of paid vacation in each calendar year.",
                "The annual holiday allowance is {v} for full-time staff.",
            ],
            "probation": [
                "New employees serve a probation period of {v}.",
                "Every new hire is on probation for the first {v}.",
                "The probationary period lasts {v} from the start date.",
                "A probation of {v} applies to all new staff.",
            ],
            "expenses": [
                "Expenses up to {v} may be claimed without prior approval.",
                "Claims of no more than {v} are reimbursed without a manager's sign-off.",
                "The limit for unapproved expense claims is {v}.",
                "Staff may spend up to {v} on work costs before approval is required.",
            ],
            "contact": [
                "Questions about this policy should be sent to {v} in Human Resources.",
                "The person responsible for this policy is {v}.",
                "Please direct any queries to {v}, the policy owner.",
                "{v} in the personnel office answers questions on these rules.",
            ],
        },
        "filler": [
            "Employees must record their working hours accurately.",
            "Harassment of any kind is not tolerated.",
            "Confidential information must not be shared outside the company.",
            "Staff should report safety hazards to their manager at once.",
            "This policy is reviewed every year.",
            "Personal use of company equipment should be kept to a minimum.",
        ],
        "questions": {
            "vacation": [
                "How much paid holiday do employees of {a} get?",
                "What is the annual leave allowance at {a}?",
                "How many days of vacation does {a} give its staff each year?",
                "How much annual leave is a full-time employee of {a} entitled to?",
                "What holiday entitlement does the {a} policy set?",
            ],
            "probation": [
                "How long is the probation period at {a}?",
                "For how long are new employees of {a} on probation?",
                "What probationary period does {a} apply to new hires?",
                "How long does probation last for new staff at {a}?",
                "What is the length of probation at {a}?",
            ],
            "expenses": [
                "Up to what amount can staff at {a} claim expenses without approval?",
                "What is the expense limit without approval at {a}?",
                "How much can an employee of {a} spend before needing approval?",
                "What is the cap on unapproved expense claims at {a}?",
                "Below what amount are expenses at {a} reimbursed without sign-off?",
            ],
            "contact": [
                "Who should questions about the {a} policy go to?",
                "Who is responsible for the staff policy of {a}?",
                "Whom should employees of {a} ask about the policy?",
                "Who owns the workplace policy at {a}?",
                "Who answers questions about the rules at {a}?",
            ],
            "effective": [
                "When does the {a} policy take effect?",
                "From what date is the {a} staff policy in force?",
                "On what date did the {a} handbook come into effect?",
                "When do the staff rules of {a} start to apply?",
                "What is the effective date of the policy at {a}?",
            ],
        },
        "answers": {
            "vacation": ["Employees get {v} of paid holiday a year", "The allowance is {v}"],
            "probation": ["The probation period is {v}", "New staff are on probation for {v}"],
            "expenses": ["Expenses up to {v} need no approval", "The limit is {v}"],
            "contact": ["Questions go to {v}", "{v} is responsible for the policy"],
            "effective": ["The policy takes effect on {v}", "It is in force from {v}"],
        },
    },
}

# How the answer points at the passage: a quote of the sentence that states the fact.
QUOTES = [
    '{answer} [{n}]. The passage says: "{quote}"',
    '{answer}, as passage [{n}] states: "{quote}"',
    '{answer} [{n}]: "{quote}"',
]
